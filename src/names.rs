//! The names users choose: tracks and listener uids, and the checks they must pass.
//!
//! Every name that comes from outside (a request body, a path, a token claim) goes
//! through [`check_track`] or [`check_uid`] before it reaches the engine, so the
//! engine and the hub can trust what they store.

/// Longest track name in bytes: long enough for paths like `rooms/42/members`,
/// short enough that an index key stays small.
pub(crate) const MAX_TRACK_BYTES: usize = 256;
/// Shortest uid: eight characters make a made-up uid hard to collide with.
pub(crate) const MIN_UID_CHARS: usize = 8;
/// Longest uid: room for a UUID with a prefix, nothing that bloats a listener record.
pub(crate) const MAX_UID_CHARS: usize = 128;

/// Why a name was refused, in words for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct BadName(pub String);

/// Checks a track name: 1–256 bytes of UTF-8, no control characters (Unicode `Cc`: C0,
/// DEL, C1), no whitespace (Unicode `White_Space`). Format characters such as U+FEFF are
/// neither, so they pass: `tests/vectors/names.json` holds the cases every client agrees on.
pub(crate) fn check_track(track: &str) -> Result<(), BadName> {
    if track.is_empty() || track.len() > MAX_TRACK_BYTES {
        return Err(BadName(format!(
            "a track is 1 to {MAX_TRACK_BYTES} bytes, this one is {}",
            track.len()
        )));
    }
    if let Some(c) = track.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(BadName(format!(
            "a track may not contain whitespace or control characters (found {c:?})"
        )));
    }
    Ok(())
}

/// Checks a uid: 8–128 characters of `A-Z a-z 0-9 - _ .`.
pub(crate) fn check_uid(uid: &str) -> Result<(), BadName> {
    if uid.len() < MIN_UID_CHARS || uid.len() > MAX_UID_CHARS {
        return Err(BadName(format!(
            "a uid is {MIN_UID_CHARS} to {MAX_UID_CHARS} characters, this one is {}",
            uid.chars().count()
        )));
    }
    if let Some(c) = uid
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(BadName(format!(
            "a uid may only contain A-Z a-z 0-9 - _ . (found {c:?})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_allow_slashes_and_semicolons_but_not_spaces() {
        assert!(check_track(":data").is_ok());
        assert!(check_track(":some/path-that/has-slashes;x").is_ok());
        assert!(check_track("héllo").is_ok());
        assert!(check_track("").is_err());
        assert!(check_track("a b").is_err());
        assert!(check_track("a\u{7}").is_err());
        assert!(check_track(&"x".repeat(257)).is_err());
        assert!(check_track(&"x".repeat(256)).is_ok());
    }

    #[test]
    fn uids_are_short_safe_ascii() {
        assert!(check_uid("abcdefgh").is_ok());
        assert!(check_uid("A-b_c.9-123456").is_ok());
        assert!(check_uid("short").is_err());
        assert!(check_uid("has/slash1").is_err());
        assert!(check_uid("ünicode12").is_err());
        assert!(check_uid(&"u".repeat(129)).is_err());
    }

    /// The vectors every suite reads (Rust, Python, JS): the rule is written once.
    const VECTORS: &str = include_str!("../tests/vectors/names.json");

    #[test]
    fn names_follow_the_shared_vectors() {
        let vectors: serde_json::Value = serde_json::from_str(VECTORS).expect("names.json");
        for (kind, check) in [
            ("tracks", check_track as fn(&str) -> Result<(), BadName>),
            ("uids", check_uid),
        ] {
            let cases = vectors[kind].as_array().expect("an array of vectors");
            assert!(!cases.is_empty(), "no {kind} in names.json");
            for case in cases {
                let name = case["name"].as_str().expect("name");
                let valid = case["valid"].as_bool().expect("valid");
                assert_eq!(
                    check(name).is_ok(),
                    valid,
                    "{kind}: {name:?} ({})",
                    case["why"]
                );
            }
        }
    }

    proptest::proptest! {
        /// Any string: no panic, and the verdict is the rule as written in the contract.
        #[test]
        fn track_check_is_the_rule(track in "\\PC{0,300}|[\\s\\S]{0,20}") {
            let rule = !track.is_empty()
                && track.len() <= MAX_TRACK_BYTES
                && !track.chars().any(|c| c.is_control() || c.is_whitespace());
            proptest::prop_assert_eq!(check_track(&track).is_ok(), rule);
        }

        #[test]
        fn uid_check_is_the_rule(uid in "[A-Za-z0-9._\\-]{0,140}|\\PC{0,20}") {
            let rule = (MIN_UID_CHARS..=MAX_UID_CHARS).contains(&uid.chars().count())
                && uid.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            proptest::prop_assert_eq!(check_uid(&uid).is_ok(), rule);
        }
    }
}
