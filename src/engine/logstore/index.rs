//! The log as readers see it: the per-track index of kept positions, where each
//! message's text is, the newest texts themselves, the idempotency keys and the
//! segments. Rebuilt from the segments at open (`load_frame`), kept up to date by each
//! commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::sync::Arc;

use super::super::local::{Bounds, KeyRecord};
use super::super::segment::{self, Entry};
use super::super::{EngineError, Message, Position, Result};

/// Message texts kept in memory, newest first: enough for every listener that is
/// keeping up (and the tens of thousands of messages a burst holds), while memory does
/// not grow with `max_stored_messages`; older texts are one `pread` away.
pub(crate) const CACHED_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Where a kept message is.
#[derive(Debug)]
pub(super) struct Stored {
    pub(super) time_ms: u64,
    pub(super) track: Arc<str>,
    pub(super) seq: u64,
    pub(super) json_at: u64,
    pub(super) json_len: u32,
    /// Its text, while it is among the newest.
    pub(super) cached: Option<Arc<Message>>,
}

/// A segment that is kept.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) file: Arc<File>,
    /// The newest position in it (0: none).
    pub(super) last_pos: Position,
}

/// The log as readers see it.
#[derive(Debug, Default)]
pub(super) struct LogState {
    pub(super) bounds: Bounds,
    /// The position of `entries[0]` (`trimmed_through + 1` once open).
    pub(super) base: Position,
    pub(super) entries: VecDeque<Stored>,
    /// Each track's kept positions, in order.
    pub(super) by_track: HashMap<Arc<str>, VecDeque<Position>>,
    /// Texts cached are those of positions from this one on.
    pub(super) cached_from: Position,
    pub(super) cached_bytes: usize,
    /// Idempotency keys, with the segment their newest record is in.
    pub(super) keys: HashMap<String, (KeyRecord, u64)>,
    /// The same keys oldest first, for expiry.
    pub(super) keys_by_age: BTreeSet<(u64, String)>,
    pub(super) segments: BTreeMap<u64, Segment>,
    /// Whether `load_frame` took in a frame yet (the first one sets where it starts).
    pub(super) loaded_a_frame: bool,
}

impl LogState {
    pub(super) fn intern(&self, track: &str) -> Arc<str> {
        self.by_track
            .get_key_value(track)
            .map_or_else(|| track.into(), |(name, _)| name.clone())
    }

    /// Adds the message at `head + 1`, keeping at most `cache_bytes` of the newest
    /// texts ([`CACHED_BODY_BYTES`] but in tests).
    pub(super) fn push(&mut self, pos: Position, stored: Stored, cache_bytes: usize) {
        if self.entries.is_empty() {
            self.base = pos;
        }
        if let Some(message) = &stored.cached {
            self.cached_bytes += message.json.len();
        } else {
            self.cached_from = pos + 1;
        }
        self.by_track
            .entry(stored.track.clone())
            .or_default()
            .push_back(pos);
        self.entries.push_back(stored);
        self.bounds.head = pos;
        while self.cached_bytes > cache_bytes && self.cached_from <= pos {
            if let Some(entry) = self.entry_mut(self.cached_from)
                && let Some(message) = entry.cached.take()
            {
                self.cached_bytes -= message.json.len();
            }
            self.cached_from += 1;
        }
    }

    pub(super) fn entry_mut(&mut self, pos: Position) -> Option<&mut Stored> {
        let at = pos.checked_sub(self.base)?;
        self.entries.get_mut(usize::try_from(at).ok()?)
    }

    pub(super) fn entry(&self, pos: Position) -> Option<&Stored> {
        let at = pos.checked_sub(self.base)?;
        self.entries.get(usize::try_from(at).ok()?)
    }

    /// Drops the messages up to `trimmed_through` from the index.
    pub(super) fn trim(&mut self, trimmed_through: Position) {
        self.bounds.trimmed_through = trimmed_through;
        while self.base <= trimmed_through
            && let Some(stored) = self.entries.pop_front()
        {
            if let Some(message) = &stored.cached {
                self.cached_bytes -= message.json.len();
            }
            if let Some(positions) = self.by_track.get_mut(&stored.track) {
                positions.pop_front();
                if positions.is_empty() {
                    self.by_track.remove(&stored.track);
                }
            }
            self.base += 1;
        }
        if self.entries.is_empty() {
            self.base = self.bounds.head + 1;
        }
        self.cached_from = self.cached_from.max(self.base);
    }

    pub(super) fn put_key(&mut self, key: &str, record: KeyRecord, seq: u64) {
        self.keys_by_age.insert((record.time_ms, key.to_owned()));
        if let Some((old, _)) = self.keys.insert(key.to_owned(), (record, seq))
            && let Some((new, _)) = self.keys.get(key)
            && old.time_ms != new.time_ms
        {
            self.keys_by_age.remove(&(old.time_ms, key.to_owned()));
        }
    }

    /// Forgets the keys recorded before `before_ms`.
    pub(super) fn expire_keys(&mut self, before_ms: u64) {
        while let Some((time, _)) = self.keys_by_age.first()
            && *time < before_ms
        {
            if let Some((_, key)) = self.keys_by_age.pop_first() {
                self.keys.remove(&key);
            }
        }
    }

    /// The message at `pos`, from the cache or its segment.
    pub(super) fn message(&self, pos: Position) -> Result<Option<Arc<Message>>> {
        let Some(stored) = self.entry(pos) else {
            return Ok(None);
        };
        if let Some(message) = &stored.cached {
            return Ok(Some(message.clone()));
        }
        let segment = self.segments.get(&stored.seq).ok_or_else(|| {
            EngineError::Storage(format!("message {pos}: segment {} is gone", stored.seq))
        })?;
        let json = segment::read_text(&segment.file, stored.json_at, stored.json_len).map_err(
            |e| match e.kind() {
                // It was whole when the log was read at open: damaged since.
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                    EngineError::Corrupt(format!(
                        "the log segment {} is damaged (message {pos} no longer reads as text): \
                     restart the server, which checks the log as it opens",
                        segment::file_name(stored.seq)
                    ))
                }
                _ => EngineError::Storage(format!("cannot read message {pos}: {e}")),
            },
        )?;
        Ok(Some(Arc::new(Message::new(
            pos,
            stored.track.clone(),
            json.into(),
            stored.time_ms,
        ))))
    }

    pub(super) fn track_after(
        &self,
        track: &str,
        after: Position,
        limit: usize,
    ) -> Result<Vec<Arc<Message>>> {
        let Some(positions) = self.by_track.get(track) else {
            return Ok(Vec::new());
        };
        let first = positions.partition_point(|&p| p <= after);
        let mut messages = Vec::with_capacity(limit.min(positions.len() - first));
        for &pos in positions.range(first..).take(limit) {
            if let Some(message) = self.message(pos)? {
                messages.push(message);
            }
        }
        Ok(messages)
    }

    /// The segments older than `current` whose messages are all trimmed.
    pub(super) fn dead_segments(&self, trimmed_through: Position, current: u64) -> Vec<u64> {
        self.segments
            .range(..current)
            .filter(|(_, s)| s.last_pos <= trimmed_through)
            .map(|(&seq, _)| seq)
            .collect()
    }

    /// Takes in one frame read at open from segment `seq`: its positions must follow
    /// the ones before.
    pub(super) fn load_frame(
        &mut self,
        seq: u64,
        entries: Vec<Entry<'_>>,
    ) -> std::result::Result<(), String> {
        let Some(Entry::Bounds(bounds)) = entries.first() else {
            return Err("a frame without bounds".into());
        };
        let bounds = *bounds;
        let count = entries
            .iter()
            .filter(|e| matches!(e, Entry::Message { .. }))
            .count() as u64;
        // The first frame read may follow messages in segments deleted since.
        if !self.loaded_a_frame {
            self.loaded_a_frame = true;
            self.bounds.head = bounds
                .head
                .checked_sub(count)
                .ok_or("a head before its messages")?;
        }
        for entry in entries {
            match entry {
                Entry::Bounds(_) => {}
                Entry::Message {
                    pos,
                    time_ms,
                    track,
                    json,
                    json_at,
                } => {
                    if pos != self.bounds.head + 1 {
                        return Err(format!(
                            "message {pos} follows message {}",
                            self.bounds.head
                        ));
                    }
                    let stored = Stored {
                        time_ms,
                        track: self.intern(track),
                        seq,
                        json_at,
                        json_len: json.len() as u32,
                        cached: None,
                    };
                    self.push(pos, stored, CACHED_BODY_BYTES);
                }
                Entry::Key { key, record } => self.put_key(key, record, seq),
                Entry::ExpireKeys { before_ms } => self.expire_keys(before_ms),
            }
        }
        if self.bounds.head != bounds.head {
            return Err(format!(
                "the frame says the head is {}, its messages end at {}",
                bounds.head, self.bounds.head
            ));
        }
        self.trim(bounds.trimmed_through.max(self.bounds.trimmed_through));
        if let Some(segment) = self.segments.get_mut(&seq) {
            segment.last_pos = segment
                .last_pos
                .max(if count > 0 { bounds.head } else { 0 });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(track: &Arc<str>, pos: Position, text: &str) -> Stored {
        Stored {
            time_ms: 0,
            track: track.clone(),
            seq: 1,
            json_at: 0,
            json_len: text.len() as u32,
            cached: Some(Arc::new(Message::new(pos, track.clone(), text.into(), 0))),
        }
    }

    fn cached(state: &LogState) -> Vec<Position> {
        (state.base..=state.bounds.head)
            .filter(|&p| state.entry(p).is_some_and(|s| s.cached.is_some()))
            .collect()
    }

    #[test]
    fn only_the_newest_texts_are_kept_within_the_bound() {
        let track: Arc<str> = ":t".into();
        let mut state = LogState::default();
        for pos in 1..=10 {
            // Ten bytes each, at most 35 kept: the newest three.
            state.push(pos, stored(&track, pos, "0123456789"), 35);
            assert!(state.cached_bytes <= 35, "{}", state.cached_bytes);
        }
        assert_eq!(cached(&state), [8, 9, 10]);
        assert_eq!(state.cached_bytes, 30);
        // Trimming a cached text gives its bytes back.
        state.trim(8);
        assert_eq!(cached(&state), [9, 10]);
        assert_eq!(state.cached_bytes, 20);
        state.trim(10);
        assert_eq!((state.cached_bytes, state.entries.len()), (0, 0));
        assert_eq!(state.base, 11);
        assert!(
            state.by_track.is_empty(),
            "a track with nothing kept is gone"
        );
        state.push(11, stored(&track, 11, "x"), 35);
        assert_eq!(cached(&state), [11]);
    }
}
